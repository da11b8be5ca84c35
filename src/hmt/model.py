"""`HMTForCausalLM`: any Hugging Face causal LM reading unbounded text segment by segment with memory.

Per segment n (docs/method.md): (1) query S_n from [T | x_n[:j] | T]; (2) recall P_n from the cache;
(3) main pass over [P_n | sensory tokens | x_n | P_n]; (4) write M_n = output at the last slot.
Queries do not depend on memory, so those of all segments run in batched backbone calls up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from hmt import __version__
from hmt.backbone import context_length, eval_mode
from hmt.config import MEMORY_MODES, WRITING_MODES, HMTConfig
from hmt.finetune import BACKBONE_DIR, has_lora, is_peft_model, load_lora, save_lora
from hmt.io import ADAPTER_NAME, CONFIG_NAME, load_tensors, save_tensors, write_text_atomic
from hmt.memory import MemoryState
from hmt.recall import MemoryParameters

ADAPTER_FORMAT = "hmt-adapter"
IGNORE_INDEX = -100
CE_BLOCK = 2048  # rows of logits turned into float32 at once when scoring


@dataclass
class HMTOutput(ModelOutput):
    """What `HMTForCausalLM.forward` returns. Index it by name, never by position."""

    loss: torch.Tensor | None = None  # scalar: mean NLL over scored tokens (None if none was scored)
    token_losses: torch.Tensor | None = None  # (batch, seq_len): NLL of each input token, 0 where unscored
    token_mask: torch.Tensor | None = None  # (batch, seq_len) bool: which tokens were scored
    logits: torch.Tensor | None = None  # (batch, n, vocab): the last n = min(seq_len, L) input positions
    state: MemoryState | None = None  # memory after the last segment; pass it to the next call
    recall_weights: list[torch.Tensor] | None = None  # per segment (batch, slots); slot -1 is the newest


@dataclass(frozen=True)
class _Packed:
    """Inputs with each row's tokens moved to the left (right padding), as the segment loop reads them."""

    ids: torch.Tensor  # (batch, seq_len) long, 0 after each row's tokens
    targets: torch.Tensor  # (batch, seq_len) long, IGNORE_INDEX after each row's tokens
    lengths: torch.Tensor  # (batch,) long: tokens per row
    offsets: torch.Tensor  # (batch,) long: left padding per row (input position = offset + packed position)


class HMTForCausalLM(nn.Module):
    """Wraps a transformers causal LM (left unchanged) with HMT's memory.

    >>> model = HMTForCausalLM(backbone, HMTConfig(segment_length=512, num_sensory=32))
    >>> out = model(input_ids)                         # any length
    >>> out2 = model(more_ids, state=out.state)        # continues where input_ids ended
    """

    def __init__(self, backbone: PreTrainedModel, config: HMTConfig | None = None) -> None:
        super().__init__()
        config = config or HMTConfig()
        embeddings, head = _embedding_and_head(backbone)
        embedding_dim = embeddings.embedding_dim
        output_dim = head.weight.shape[1]
        _check_positions(backbone, config)
        _check_memory_layer(backbone, config, output_dim)
        self.backbone = backbone
        self.config = config.replace(
            recall_dim=config.recall_dim or embedding_dim,
            embedding_dim=embedding_dim,
            backbone_type=backbone.config.model_type,
            backbone=config.backbone or getattr(backbone.config, "_name_or_path", None) or None,
        )
        if config.embedding_dim is not None and config.embedding_dim != embedding_dim:
            raise ValueError(
                f"config was made for embedding width {config.embedding_dim}, but this backbone has "
                f"{embedding_dim}; use a config made for this backbone"
            )
        device = embeddings.weight.device
        self.memory = MemoryParameters(
            embedding_dim,
            output_dim,
            self.config.recall_dim,
            _embedding_std(embeddings),
            self.config.memory_norm,
            self.config.recall_norm,
            self.config.recall_init,
            _sink_init(backbone, embeddings) if self.config.attention_sink else None,
            self.config.memory_tokens,
            self.config.memory_offset,
        ).to(device=device, dtype=torch.float32)
        self.memory.calibrate(*self._measure_norms())

    def _measure_norms(self) -> tuple[float, float]:
        """Mean norms of token embeddings and of the (projected) hidden states segments write, on a fixed probe input."""
        embeddings = self.backbone.get_input_embeddings()
        length = min(64, context_length(self.backbone.config) or 64)
        step = max(1, embeddings.num_embeddings // length)
        ids = (torch.arange(length, device=embeddings.weight.device) * step)[None, :]
        with torch.no_grad(), eval_mode(self.backbone):  # no dropout in the probe
            inputs = embeddings(ids)
            out = self.backbone(
                inputs_embeds=inputs,
                logits_to_keep=torch.zeros_like(ids, dtype=torch.bool),
                output_hidden_states=[self._write_layer],
                use_cache=False,
            )
            hidden = self.memory.project(out.hidden_states[self._write_layer])
            if self.config.memory_layer is not None:
                # A middle layer's first position holds the attention sink's outsized state; the write
                # slots, at a segment's end, never do.
                hidden = hidden[:, 1:]
        return float(inputs.float().norm(dim=-1).mean()), float(hidden.norm(dim=-1).mean())

    # ---- properties -------------------------------------------------------------------------

    @property
    def _write_layer(self) -> int:
        """Index into the backbone's hidden states of what a segment writes (-1: the final, normed one)."""
        return -1 if self.config.memory_layer is None else self.config.memory_layer

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

    def reconfigure(self, **changes: object) -> None:
        """Change settings that need no new parameters (mode, segment_length, num_sensory, cache_size, ...).

        Used to evaluate one set of memory parameters in several modes; checks the new settings fit.
        """
        fixed = {
            "recall_dim", "embedding_dim", "backbone_type", "memory_norm", "recall_norm", "recall_init",
            "attention_sink", "memory_tokens", "memory_offset", "memory_layer",
        }  # fmt: skip
        fixed &= set(changes)
        if fixed:
            raise ValueError(
                f"{sorted(fixed)} are tied to the parameters; build a new HMTForCausalLM instead"
            )
        config = self.config.replace(**changes)
        _check_positions(self.backbone, config)
        self.config = config

    def empty_state(self, batch_size: int = 1) -> MemoryState:
        return MemoryState.empty(
            batch_size, self.memory_width, self.config.num_sensory, self.vocab_size, device=self.device
        )

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        state: MemoryState | None = None,
        return_logits: bool = False,
        num_logits: int | None = None,
        bptt_depth: int | None = None,
    ) -> HMTOutput:
        """Read `input_ids` (batch, seq_len) of any length segment by segment.

        Each token is scored against the prediction before it (targets: `labels` if given, else the
        input ids; -100 is ignored), including the first token of a call that continues a `state`.
        Segments start at the beginning of each call, so chunked calls equal one call on the
        concatenation when every chunk but the last holds a whole number of segments.
        `attention_mask` marks each row's tokens as one contiguous run (left or right padding).
        Logits are returned for the last `num_logits` input positions (default: one segment's worth;
        0: none, for scoring long texts cheaply); `return_logits=True` returns them all.
        `bptt_depth=k` cuts the graph through memory every k segments (truncated backpropagation):
        no gradient flows through the memory state into a segment more than k segments back.
        """
        if bptt_depth is not None and (not isinstance(bptt_depth, int) or bptt_depth < 1):
            raise ValueError(f"bptt_depth must be a positive integer or None, got {bptt_depth!r}")
        packed = self._pack(input_ids, attention_mask, labels)
        batch, seq_len = input_ids.shape
        state = self._check_state(state, batch)
        cfg = self.config
        use_memory = cfg.mode in MEMORY_MODES
        use_sensory = cfg.mode != "backbone" and cfg.num_sensory > 0
        num_steps = math.ceil(int(packed.lengths.max()) / cfg.segment_length)
        queries = self._encode_queries(packed, num_steps) if cfg.mode == "hmt" else None
        if return_logits:
            keep_logits = seq_len
        elif num_logits is None:
            keep_logits = min(seq_len, cfg.segment_length)
        elif isinstance(num_logits, int) and num_logits >= 0:
            keep_logits = min(seq_len, num_logits)
        else:
            raise ValueError(f"num_logits must be a non-negative integer or None, got {num_logits!r}")
        collector = _ScoreCollector(packed, state, keep_logits, seq_len)

        recall_weights: list[torch.Tensor] = []
        for step in range(num_steps):
            if bptt_depth is not None and step > 0 and step % bptt_depth == 0:
                state = state.detach()
            start = step * cfg.segment_length
            seg_lengths = (packed.lengths - start).clamp(0, cfg.segment_length)
            seg_ids = packed.ids[:, start : start + cfg.segment_length]
            active = seg_lengths > 0
            if not use_memory:
                read = None
            elif cfg.mode == "memory_off":
                read = self.memory.initial_memory.expand(batch, -1)
            elif cfg.mode == "rmt":
                read = self.memory.last_memory(state.memories, state.memory_mask)
            else:
                read, weights = self.memory.recall(
                    queries[:, step], state.memories, state.memory_mask, cfg.recall_recency
                )
                recall_weights.append(weights)
            logits, written = self._main_pass(seg_ids, seg_lengths, state, read, use_sensory)
            collector.add_segment(start, seg_lengths, logits)
            if cfg.mode in WRITING_MODES:
                state = state.with_memory(written, active, cfg.cache_size)
            state = state.with_tokens_read(seg_ids, seg_lengths)
        state = collector.carry_prediction(state)
        loss, token_losses, token_mask, logits = collector.finish()
        return HMTOutput(
            loss=loss,
            token_losses=token_losses,
            token_mask=token_mask,
            logits=logits,
            state=state,
            recall_weights=recall_weights if cfg.mode == "hmt" else None,
        )

    def _main_pass(
        self,
        seg_ids: torch.Tensor,
        seg_lengths: torch.Tensor,
        state: MemoryState,
        read: torch.Tensor | None,
        use_sensory: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One backbone call over the active rows: [P | sensory | segment | P] (memory modes), [sensory |
        segment] (sliding) or the segment alone (backbone); P is r embeddings, after the sink if any.

        Returns the logits at every segment position of the active rows, flattened row by row
        (sum(seg_lengths), vocab), and the written memory per row (batch, r * d) (zeros for inactive rows).
        """
        embed = self.backbone.get_input_embeddings()
        dtype = embed.weight.dtype
        use_memory = read is not None
        rows = torch.nonzero(seg_lengths > 0).flatten().tolist()
        read_slots = self.memory.as_tokens(read).to(dtype) if use_memory else None  # (batch, r, d)
        sequences, text_starts = [], []
        for row in rows:
            tokens = seg_ids[row, : int(seg_lengths[row])]
            if use_sensory:
                tokens = torch.cat([state.sensory_ids[row][state.sensory_mask[row]], tokens])
            pieces = embed(tokens)
            prefix = 0
            if use_memory:
                slots = read_slots[row]
                pieces = torch.cat([slots, pieces, slots])
                prefix = len(slots)
                if self.config.attention_sink:
                    pieces = torch.cat([self.memory.sink.to(dtype)[None, :], pieces])
                    prefix += 1
            sequences.append(pieces)
            text_starts.append(prefix + len(tokens) - int(seg_lengths[row]))
        inputs = pad_sequence(sequences, batch_first=True)  # (rows, width, d)
        lengths = torch.tensor([len(s) for s in sequences], device=inputs.device)
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        attention_mask = (positions[None, :] < lengths[:, None]).long()
        starts = torch.tensor(text_starts, device=inputs.device)
        text_ends = starts + seg_lengths[rows].to(inputs.device)
        keep = (positions[None, :] >= starts[:, None]) & (positions[None, :] < text_ends[:, None])
        out = self.backbone(
            inputs_embeds=inputs,
            attention_mask=None if bool(attention_mask.all()) else attention_mask,
            logits_to_keep=keep,
            output_hidden_states=[self._write_layer] if use_memory else False,
            use_cache=False,
        )
        if not use_memory:
            return out.logits, None
        states = out.hidden_states[self._write_layer]  # (rows, width, output_dim)
        # The write slots: the last r positions of each row.
        write_positions = (
            lengths[:, None]
            - self.config.memory_tokens
            + torch.arange(self.config.memory_tokens, device=states.device)
        )
        row_index = torch.arange(len(rows), device=states.device)[:, None]
        written_rows = self.memory.to_memory(states[row_index, write_positions])  # (rows, r * d)
        written = written_rows.new_zeros(seg_ids.shape[0], self.memory_width)
        written = written.index_put((torch.tensor(rows, device=written.device),), written_rows)
        return out.logits, written

    def _encode_queries(self, packed: _Packed, num_steps: int) -> torch.Tensor:
        """S_n for every segment of every row: last output of [T | first j tokens | T], batched.

        Returns (batch, num_steps, output_dim); rows hold zeros for segments they do not have.
        """
        cfg = self.config
        embed = self.backbone.get_input_embeddings()
        prompt = self.memory.summary_prompt.to(embed.weight.dtype)[None, :]
        batch = packed.ids.shape[0]
        jobs = []  # (row, step, number of query tokens)
        for row in range(batch):
            row_steps = math.ceil(int(packed.lengths[row]) / cfg.segment_length)
            for step in range(row_steps):
                start = step * cfg.segment_length
                jobs.append((row, step, min(cfg.query_length, int(packed.lengths[row]) - start)))
        outputs = []
        for first in range(0, len(jobs), cfg.query_batch_size):
            chunk = jobs[first : first + cfg.query_batch_size]
            sequences = [
                torch.cat(
                    [
                        prompt,
                        embed(packed.ids[row, step * cfg.segment_length : step * cfg.segment_length + n]),
                        prompt,
                    ]
                )
                for row, step, n in chunk
            ]
            inputs = pad_sequence(sequences, batch_first=True)
            lengths = torch.tensor([n + 2 for _, _, n in chunk], device=inputs.device)
            positions = torch.arange(inputs.shape[1], device=inputs.device)
            attention_mask = (positions[None, :] < lengths[:, None]).long()
            out = self.backbone(
                inputs_embeds=inputs,
                attention_mask=None if bool(attention_mask.all()) else attention_mask,
                logits_to_keep=torch.zeros_like(attention_mask, dtype=torch.bool),  # no logits needed
                output_hidden_states=[-1],
                use_cache=False,
            )
            final = out.hidden_states[-1]
            outputs.append(final[torch.arange(len(chunk), device=final.device), lengths - 1])
        flat = torch.cat(outputs).float()  # (jobs, output_dim)
        rows = torch.tensor([row for row, _, _ in jobs], device=flat.device)
        steps = torch.tensor([step for _, step, _ in jobs], device=flat.device)
        queries = flat.new_zeros(batch, num_steps, flat.shape[1])
        return queries.index_put((rows, steps), flat)

    # ---- input checks -----------------------------------------------------------------------

    def _pack(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> _Packed:
        """Validate inputs and move each row's tokens to the left."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = (
                tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            )
            raise ValueError(
                f"input_ids must be a 2-D tensor (batch, seq_len), got {shape}; add a batch dimension"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        batch, seq_len = input_ids.shape
        if batch == 0 or seq_len == 0:
            raise ValueError(
                f"empty input: input_ids has shape {tuple(input_ids.shape)}; give at least one token"
            )
        device = input_ids.device
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                    f"{tuple(input_ids.shape)}"
                )
            mask = attention_mask.to(device).bool()
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        lengths = mask.sum(dim=1)
        if int(lengths.sum()) == 0:
            raise ValueError("empty input: attention_mask marks no tokens")
        starts = mask.long().argmax(dim=1)  # first token of each row (0 for empty rows)
        positions = torch.arange(seq_len, device=device)
        expected = (positions[None, :] >= starts[:, None]) & (
            positions[None, :] < (starts + lengths)[:, None]
        )
        if not torch.equal(expected, mask):
            raise ValueError(
                "attention_mask must mark one contiguous run of tokens per row (left or right padding); "
                "split texts with gaps into separate rows"
            )
        vocab = self.vocab_size
        real = input_ids[mask]
        if bool(((real < 0) | (real >= vocab)).any()):
            bad = real[(real < 0) | (real >= vocab)][0].item()
            raise ValueError(
                f"token id {bad} is outside the backbone's vocabulary [0, {vocab}); "
                "was the text tokenized with another model's tokenizer?"
            )
        targets = input_ids if labels is None else labels.to(device)
        if labels is not None:
            real_labels = targets[mask]
            bad_labels = (real_labels != IGNORE_INDEX) & ((real_labels < 0) | (real_labels >= vocab))
            if bool(bad_labels.any()):
                raise ValueError(
                    f"label {real_labels[bad_labels][0].item()} is outside the vocabulary [0, {vocab}) "
                    f"and is not the ignore index {IGNORE_INDEX}"
                )
        # Gather each row's tokens to the front: packed position p reads input position start + p.
        source = (starts[:, None] + positions[None, :]).clamp(max=seq_len - 1)
        inside = positions[None, :] < lengths[:, None]
        ids = torch.where(inside, input_ids.gather(1, source), 0).long()
        packed_targets = torch.where(inside, targets.gather(1, source), IGNORE_INDEX).long()
        return _Packed(ids=ids, targets=packed_targets, lengths=lengths, offsets=starts)

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
        if (
            state.memories.shape[2] != self.memory_width
            or state.sensory_ids.shape[1] != self.config.num_sensory
        ):
            raise ValueError(
                f"state was made by a model with memory width {state.memories.shape[2]} and "
                f"{state.sensory_ids.shape[1]} sensory tokens; this model has {self.memory_width} and "
                f"{self.config.num_sensory}"
            )
        if state.next_token_logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"state was made for a vocabulary of {state.next_token_logits.shape[1]}, this backbone has "
                f"{self.vocab_size}"
            )
        return state.to(self.device)

    # ---- save / load --------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, save_backbone: bool = False) -> None:
        """Write HMT's own parameters (safetensors) and config (JSON), plus LoRA weights if the backbone
        has them (peft's files). The backbone itself is written (to `backbone/`) only if asked, e.g.
        after full fine-tuning."""
        directory = Path(directory)
        if is_peft_model(self.backbone):
            save_lora(self.backbone, directory)
        if save_backbone:
            self.backbone.save_pretrained(directory / BACKBONE_DIR)
        config = self.config.replace(hmt_version=__version__)
        tensors = {name: p.detach().float() for name, p in self.memory.state_dict().items()}
        save_tensors(
            directory / ADAPTER_NAME,
            tensors,
            {
                "format": ADAPTER_FORMAT,
                "hmt_version": __version__,
                "backbone_type": str(config.backbone_type),
            },
        )
        write_text_atomic(directory / CONFIG_NAME, config.to_json())

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: PreTrainedModel, trainable_lora: bool = False
    ) -> HMTForCausalLM:
        """Restore an adapter written by `save_pretrained` onto `backbone`, refusing one that does not fit.

        LoRA weights in the folder are merged into `backbone` in place (fast inference), or attached
        as trainable peft adapters with `trainable_lora=True`.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: {directory} is not an HMT adapter folder (written by save_pretrained)"
            )
        config = HMTConfig.from_json_file(config_path)
        embedding_dim = backbone.get_input_embeddings().embedding_dim
        kind = backbone.config.model_type
        if config.backbone_type is not None and config.backbone_type != kind:
            raise ValueError(
                f"adapter in {directory} was made for a {config.backbone_type} backbone "
                f"({config.backbone or 'unnamed'}), but this backbone is {kind}; load it onto the backbone it "
                "was trained with"
            )
        if config.embedding_dim is not None and config.embedding_dim != embedding_dim:
            raise ValueError(
                f"adapter in {directory} was made for embedding width {config.embedding_dim}, but this "
                f"backbone has width {embedding_dim}; load it onto the backbone it was trained with"
            )
        tensors, _ = load_tensors(directory / ADAPTER_NAME, ADAPTER_FORMAT)
        if has_lora(directory):
            backbone = load_lora(backbone, directory, trainable=trainable_lora)
        model = cls(backbone, config)
        expected = model.memory.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{directory / ADAPTER_NAME} does not match this model: missing {missing}, unexpected {unexpected}"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{directory / ADAPTER_NAME}: {name} has shape {tuple(tensor.shape)}, this backbone needs "
                    f"{tuple(expected[name].shape)}"
                )
        model.memory.load_state_dict(tensors)
        return model


class _ScoreCollector:
    """Turns per-segment logits into token losses, the returned logits and the carried prediction.

    Logits at packed position p predict the token at p + 1; the last position of a row predicts past
    the input and is carried in the state to score the first token of the next call.
    """

    def __init__(self, packed: _Packed, state: MemoryState, keep_logits: int, seq_len: int) -> None:
        self.packed = packed
        self.keep_logits = keep_logits
        self.seq_len = seq_len
        self.rows: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []  # packed positions of the scored tokens
        self.losses: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None
        self.next_logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The first token of a continuing row is scored with the prediction carried in the state.
        continuing = torch.nonzero((state.tokens > 0) & (packed.lengths > 0)).flatten()
        if len(continuing):
            self._score(continuing, torch.zeros_like(continuing), state.next_token_logits[continuing])

    def _score(self, rows: torch.Tensor, target_positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Score the tokens at (rows, target_positions) against `logits`; positions past a row are skipped."""
        inside = target_positions < self.packed.lengths[rows]
        targets = torch.where(
            inside, self.packed.targets[rows, target_positions.clamp(max=self.seq_len - 1)], IGNORE_INDEX
        )
        scored = targets != IGNORE_INDEX
        if not bool(scored.any()):
            return
        # In float32 for accuracy, a block of rows at a time: no copy of the logits beyond one fp32 block.
        losses = torch.cat(
            [
                F.cross_entropy(logits[i : i + CE_BLOCK].float(), targets[i : i + CE_BLOCK], reduction="none")
                for i in range(0, len(targets), CE_BLOCK)
            ]
        )
        self.rows.append(rows[scored])
        self.positions.append(target_positions[scored])
        self.losses.append(losses[scored])

    def add_segment(self, start: int, seg_lengths: torch.Tensor, logits: torch.Tensor) -> None:
        """logits: (sum(seg_lengths), vocab) for the active rows' segment positions, row by row."""
        active = torch.nonzero(seg_lengths > 0).flatten()
        counts = seg_lengths[active]
        rows = torch.repeat_interleave(active, counts)
        offsets = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        positions = start + offsets  # packed position of each logit
        self._score(rows, positions + 1, logits)
        last = positions + 1 == self.packed.lengths[rows]  # each row's last token predicts past the input
        if bool(last.any()):
            self.next_logits.append((rows[last], logits[last]))
        self._keep_logits(rows, positions, logits)

    def _keep_logits(self, rows: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        input_positions = self.packed.offsets[rows] + positions
        first_kept = self.seq_len - self.keep_logits
        kept = input_positions >= first_kept
        if self.keep_logits == 0 or not bool(kept.any()):
            return
        if self.logits is None:
            self.logits = logits.new_zeros(self.packed.ids.shape[0], self.keep_logits, logits.shape[1])
        self.logits = self.logits.index_put((rows[kept], input_positions[kept] - first_kept), logits[kept])

    def carry_prediction(self, state: MemoryState) -> MemoryState:
        """The state with each row's prediction for the token after its input."""
        if not self.next_logits:
            return state
        rows = torch.cat([r for r, _ in self.next_logits])
        logits = torch.cat([v for _, v in self.next_logits]).float()
        carried = state.next_token_logits.index_put((rows,), logits)
        return MemoryState(**{**state.tensors(), "next_token_logits": carried})

    def finish(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch = self.packed.ids.shape[0]
        device = self.packed.ids.device
        packed_losses = torch.zeros(batch, self.seq_len, device=device)
        packed_mask = torch.zeros(batch, self.seq_len, dtype=torch.bool, device=device)
        loss = None
        if self.losses:
            rows, positions = torch.cat(self.rows), torch.cat(self.positions)
            losses = torch.cat(self.losses)
            packed_losses = packed_losses.index_put((rows, positions), losses)
            packed_mask[rows, positions] = True
            loss = losses.mean()
        # Back to input positions: packed position p of row b is input position offsets[b] + p.
        positions = torch.arange(self.seq_len, device=device)
        source = (positions[None, :] - self.packed.offsets[:, None]).clamp(min=0)
        in_row = positions[None, :] >= self.packed.offsets[:, None]
        token_losses = torch.where(in_row, packed_losses.gather(1, source), 0.0)
        token_mask = in_row & packed_mask.gather(1, source)
        return loss, token_losses, token_mask, self.logits


def _embedding_and_head(backbone: nn.Module) -> tuple[nn.Embedding, nn.Module]:
    """The backbone's input embedding and LM head, or a clear error if it is not a causal LM."""
    if not hasattr(backbone, "get_input_embeddings") or not hasattr(backbone, "config"):
        raise TypeError(
            f"backbone must be a transformers causal LM (e.g. AutoModelForCausalLM), got {type(backbone).__name__}"
        )
    embeddings = backbone.get_input_embeddings()
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    if not isinstance(embeddings, nn.Embedding) or head is None or not hasattr(head, "weight"):
        raise TypeError(
            f"{type(backbone).__name__} has no token embedding and LM head; load it with AutoModelForCausalLM"
        )
    return embeddings, head


def _embedding_std(embeddings: nn.Embedding) -> float:
    """Spread of the backbone's token embeddings as the model sees them (any internal scaling included)."""
    with torch.no_grad():
        sample = torch.arange(min(embeddings.num_embeddings, 8192), device=embeddings.weight.device)
        return float(embeddings(sample).float().std())


def _sink_init(backbone: PreTrainedModel, embeddings: nn.Embedding) -> torch.Tensor:
    """The backbone's BOS embedding (what it saw first in pre-training), else its first token's."""
    bos = getattr(backbone.config, "bos_token_id", None)
    index = bos if isinstance(bos, int) and 0 <= bos < embeddings.num_embeddings else 0
    with torch.no_grad():
        return embeddings(torch.tensor([index], device=embeddings.weight.device))[0].float()


def _check_memory_layer(backbone: PreTrainedModel, config: HMTConfig, output_dim: int) -> None:
    """Refuse a memory_layer the backbone does not have, or whose states are not as wide as its output."""
    if config.memory_layer is None:
        return
    layers = getattr(backbone.config, "num_hidden_layers", None)
    if isinstance(layers, int) and config.memory_layer > layers:
        raise ValueError(
            f"memory_layer = {config.memory_layer}, but the backbone has {layers} layers; "
            f"give 1 to {layers}, or none for the final hidden state"
        )
    width = getattr(backbone.config, "hidden_size", output_dim)
    if width != output_dim:
        raise ValueError(
            f"memory_layer needs layer outputs as wide as the final hidden state, but this backbone's "
            f"layers are {width} wide and its output {output_dim}; leave memory_layer unset"
        )


def _check_positions(backbone: PreTrainedModel, config: HMTConfig) -> None:
    """Refuse segments that do not fit the backbone's position range."""
    limit = context_length(backbone.config)
    if config.mode == "backbone":
        needed, what = config.segment_length, "segment_length"
    elif config.mode == "sliding":
        needed, what = config.segment_length + config.num_sensory, "segment_length + num_sensory"
    else:
        slots = 2 * config.memory_tokens + int(config.attention_sink)
        needed, what = (
            config.segment_length + config.num_sensory + slots,
            f"segment_length + num_sensory + {slots} memory and sink slots",
        )
    if limit is not None and needed > limit:
        raise ValueError(
            f"{what} = {needed} positions, but the backbone supports {limit}; use a smaller segment_length"
        )

